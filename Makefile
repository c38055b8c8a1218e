# spark-hydrogen: `make demo` and `make test` do all the set-up on a fresh machine
# (Python >= 3.10 with venv, and Java 17 for Spark).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# compatibility subset on the newest pyspark 3.5.x, in a second environment (two test processes, as `make test`)
COMPAT_PYSPARK ?= 3.5.9
CVENV  := .venv-spark35
CPY    := $(CVENV)/bin/python
CSTAMP := $(CVENV)/.installed-$(COMPAT_PYSPARK)

# the oldest and newest Python that requires-python claims: unit + core Spark tests (no torch) on each,
# in their own environments; the interpreters come from scripts/find_python.sh (PATH, then pyenv).
# pip takes the newest pyspark each Python can have: 4.3.0 needs Python >= 3.11, so 3.10 gets 4.2.x
P310   := .venv-py310
P313   := .venv-py313
CORE_TESTS := tests/unit tests/spark/test_spark_barrier.py tests/spark/test_spark_recovery.py \
              tests/spark/test_spark_dataframe.py

# ruff and mypy, pinned in the [lint] extra
LSTAMP := $(VENV)/.installed-lint

# PyTorch is an optional extra; tests pin the CPU build (plain `torch` would pull a multi-GB CUDA build)
TORCH_VERSION ?= 2.13.0
TSTAMP := $(VENV)/.installed-torch-$(TORCH_VERSION)

# sparkhydrogen.mlflow against a real `mlflow server`: the client and server of MLflow 3.17.2 without the full
# `mlflow` package, whose pins (pyarrow<26, cryptography<51) would downgrade the venv's pyarrow and cryptography
MLFLOW := "mlflow-skinny==3.17.2" "Flask==3.1.3" "flask-cors==6.0.5" "sqlalchemy==2.1.9" "alembic==1.20.1" \
          "graphene==3.4.3" "huey==3.5.4" "psutil==7.2.2"

# the frameworks the launchers serve, tested for real: CPU builds, pinned (torch pinned alongside so pip keeps it)
FRAMEWORKS := "jax==0.10.2" "jaxlib==0.10.2" "tensorflow-cpu==2.21.0" "tf-keras==2.21.0" "lightning==2.6.6" \
              "deepspeed==0.19.8" $(MLFLOW)
FSTAMP := $(VENV)/.installed-frameworks-4

export SPARK_LOCAL_IP ?= 127.0.0.1
export PYSPARK_PYTHON := $(abspath $(VPY))

.PHONY: chromium frameworks demo test test-unit test-load test-gpu test-compat test-py310 test-py313 lint bench bench-petastorm-env zip java venv torch horovod clean

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

frameworks: $(FSTAMP)

# DeepSpeed builds its CPU shared-memory comm op on first use (1-2 min, 2 cores): built here, once, so that no test
# pays for it (a test timed out mid-build leaves torch's build lock behind, and every later build waits on it).
# It is built inside the venv (TORCH_EXTENSIONS_DIR; tests/conftest.py sets the same): torch's shared
# ~/.cache/torch_extensions would be rebuilt by every other checkout's venv, its ninja file naming that venv's paths.
$(FSTAMP): $(TSTAMP)
	DS_BUILD_OPS=0 $(VPY) -m pip install --quiet "torch==$(TORCH_VERSION)" $(FRAMEWORKS)
	DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions $(VPY) -c "from deepspeed.accelerator import get_accelerator as a; \
	  a().create_op_builder('ShareMemCommBuilder').load()"
	@touch $(FSTAMP)

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

# headless Chromium from Debian's packages: the HTML gang report's browser test (tests/spark/test_diagnosis.py)
# loads the report in it. Skipped when a chromium is on PATH already.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  sudo=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium; }

# everything but the load/soak runs (tests/load, marked `load`): those are `make test-load`.
# Two test processes side by side (pytest-xdist), each module's tests in one of them with its own Spark
# session: most Spark tests wait (JVM starts, start bounds, peers), so two halve the time on 2 cores.
# TEST_WORKERS=0 runs in this process alone.
TEST_WORKERS ?= 2
test: venv java torch horovod frameworks chromium
	$(VPY) -m pytest -m "not load" -n $(TEST_WORKERS) --dist loadfile

test-unit: venv
	$(VPY) -m pytest tests/unit

test-load: venv
	$(VPY) -m pytest -m load tests/load

# real-GPU tests (tests/gpu): each skips, saying why, when torch sees no CUDA device
test-gpu: venv java torch
	$(VPY) -m pytest -rs tests/gpu

$(CSTAMP): pyproject.toml
	$(PYTHON) -m venv $(CVENV)
	$(CPY) -m pip install --quiet --upgrade pip
	$(CPY) -m pip install --quiet "pyspark==$(COMPAT_PYSPARK)" -e ".[test]"
	@touch $(CSTAMP)

test-compat: $(CSTAMP) java
	PYSPARK_PYTHON=$(abspath $(CPY)) $(CPY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests/unit tests/spark/test_spark_barrier.py \
	  tests/spark/test_spark_recovery.py tests/spark/test_spark_dataframe.py \
	  tests/transparent/test_transparent_pyspark.py tests/transparent/test_transparent_install.py \
	  tests/transparent/test_transparent_context.py

# one environment per extra Python: created from that interpreter, -e ".[test]" without torch
$(P310)/.installed: pyproject.toml
	@py=$$(PYTHON_3_10="$(PYTHON_3_10)" scripts/find_python.sh 3.10) && echo "$(P310): $$py" && $$py -m venv $(P310)
	$(P310)/bin/python -m pip install --quiet --upgrade pip
	$(P310)/bin/python -m pip install --quiet -e ".[test]"
	@touch $@

$(P313)/.installed: pyproject.toml
	@py=$$(PYTHON_3_13="$(PYTHON_3_13)" scripts/find_python.sh 3.13) && echo "$(P313): $$py" && $$py -m venv $(P313)
	$(P313)/bin/python -m pip install --quiet --upgrade pip
	$(P313)/bin/python -m pip install --quiet -e ".[test]"
	@touch $@

test-py310: $(P310)/.installed java
	PYSPARK_PYTHON=$(abspath $(P310))/bin/python $(P310)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(CORE_TESTS)

test-py313: $(P313)/.installed java
	PYSPARK_PYTHON=$(abspath $(P313))/bin/python $(P313)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(CORE_TESTS)

$(LSTAMP): $(STAMP)
	$(VPY) -m pip install --quiet -e ".[lint]"
	@touch $@

# mypy needs torch installed to check sparkhydrogen.torch
# mypy --strict checks the optional integrations (MLflow, Lightning, ...) against the frameworks themselves
lint: $(LSTAMP) $(FSTAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples scripts
	$(VENV)/bin/mypy --strict src

# Petastorm, the data feed's baseline (benchmarks/bench_data.py), in an environment of its own: 0.13.1 pins
# setuptools<70 (torch 2.13 needs newer; petastorm's code never imports setuptools, so it goes in --no-deps)
# and calls the legacy ParquetDataset(validate_schema=...), which pyarrow 15 removed (so pyarrow 14, numpy 1.x,
# pyspark 3.5)
PETASTORM_VENV := .venv-bench-petastorm
PSTAMP := $(PETASTORM_VENV)/.installed-1
PETASTORM_PINS := "pyarrow==14.0.2" "numpy==1.26.4" "pandas==2.2.3" "pyspark==$(COMPAT_PYSPARK)" \
                  "torch==$(TORCH_VERSION)" "dill==0.4.1" "diskcache==5.6.3" "future==1.0.0" "packaging==26.4" \
                  "psutil==7.2.2" "pyzmq==27.3.0" "six==1.17.0" "fsspec==2026.9.0"

bench-petastorm-env: $(PSTAMP)

$(PSTAMP):
	$(PYTHON) -m venv $(PETASTORM_VENV)
	$(PETASTORM_VENV)/bin/python -m pip install --quiet $(PETASTORM_PINS)
	$(PETASTORM_VENV)/bin/python -m pip install --quiet --no-deps "petastorm==0.13.1"
	@touch $@

bench: venv java torch horovod bench-petastorm-env
	$(VPY) benchmarks/run_all.py --output docs/benchmarks.md

zip: venv
	$(VPY) scripts/make_zip.py --output dist/sparkhydrogen.zip

clean:
	rm -rf $(VENV) $(CVENV) $(P310) $(P313) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
