# spark-hydrogen: `make demo` and `make test` do all the set-up on a fresh machine
# (Python >= 3.10 with venv, and Java 17 for Spark).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export SPARK_LOCAL_IP ?= 127.0.0.1
export PYSPARK_PYTHON := $(abspath $(VPY))

.PHONY: demo test test-unit bench java venv clean

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

test: venv java
	$(VPY) -m pytest

test-unit: venv
	$(VPY) -m pytest tests/unit

bench: venv java
	$(VPY) benchmarks/run_all.py --output docs/benchmarks.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
