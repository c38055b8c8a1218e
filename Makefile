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

# PyTorch is an optional extra; tests pin the CPU build (plain `torch` would pull a multi-GB CUDA build)
TORCH_VERSION ?= 2.13.0
TSTAMP := $(VENV)/.installed-torch-$(TORCH_VERSION)

export SPARK_LOCAL_IP ?= 127.0.0.1
export PYSPARK_PYTHON := $(abspath $(VPY))

.PHONY: demo test test-unit test-compat bench zip java venv torch horovod clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.10+ is required (python3 not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

torch: $(TSTAMP)

$(TSTAMP): $(STAMP)
	$(VPY) -m pip install --quiet "torch==$(TORCH_VERSION)" "scikit-learn>=1.3"
	@touch $(TSTAMP)

# Horovod 0.28.1 built against the venv's torch (C++17 patch), wheel cached in ~/.cache/sparkhydrogen
horovod: torch
	scripts/build_horovod.sh $(abspath $(VPY))

java:
	@command -v java >/dev/null 2>&1 || { \
	  echo "Java 17 is required by Spark but 'java' is not on PATH."; \
	  echo "Install it, e.g.: sudo apt-get install -y openjdk-17-jre-headless"; exit 1; }

demo: venv java
	$(VPY) examples/quickstart.py
	$(VPY) examples/pipeline.py

test: venv java torch horovod
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

bench: venv java torch horovod
	$(VPY) benchmarks/run_all.py --output docs/benchmarks.md

zip: venv
	$(VPY) scripts/make_zip.py --output dist/sparkhydrogen.zip

clean:
	rm -rf $(VENV) $(CVENV) build dist src/*.egg-info .pytest_cache
