# spark-hydrogen: `make demo` and `make test` do all the set-up on a fresh machine
# (Python >= 3.10 with venv, and Java 17 for Spark).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# compatibility subset on the newest pyspark 3.5.x, in a second environment
COMPAT_PYSPARK ?= 3.5.9
CVENV  := .venv-spark35
CPY    := $(CVENV)/bin/python
CSTAMP := $(CVENV)/.installed-$(COMPAT_PYSPARK)

export SPARK_LOCAL_IP ?= 127.0.0.1
export PYSPARK_PYTHON := $(abspath $(VPY))

.PHONY: demo test test-unit test-compat bench zip java venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.10+ is required (python3 not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

java:
	@command -v java >/dev/null 2>&1 || { \
	  echo "Java 17 is required by Spark but 'java' is not on PATH."; \
	  echo "Install it, e.g.: sudo apt-get install -y openjdk-17-jre-headless"; exit 1; }

demo: venv java
	$(VPY) examples/quickstart.py
	$(VPY) examples/pipeline.py

test: venv java
	$(VPY) -m pytest

test-unit: venv
	$(VPY) -m pytest tests/unit

$(CSTAMP): pyproject.toml
	$(PYTHON) -m venv $(CVENV)
	$(CPY) -m pip install --quiet --upgrade pip
	$(CPY) -m pip install --quiet "pyspark==$(COMPAT_PYSPARK)" -e ".[test]"
	@touch $(CSTAMP)

test-compat: $(CSTAMP) java
	PYSPARK_PYTHON=$(abspath $(CPY)) $(CPY) -m pytest tests/unit tests/spark/test_spark_barrier.py \
	  tests/spark/test_spark_recovery.py tests/spark/test_spark_dataframe.py

bench: venv java
	$(VPY) benchmarks/run_all.py --output docs/benchmarks.md

zip: venv
	$(VPY) scripts/make_zip.py --output dist/sparkhydrogen.zip

clean:
	rm -rf $(VENV) $(CVENV) build dist src/*.egg-info .pytest_cache
