# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml scripts/install_weights.sh | cksum | cut -d' ' -f1)

.PHONY: demo test bench data clean-venv

$(STAMP): pyproject.toml scripts/install_weights.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	VENV=$(VENV) bash scripts/install_weights.sh
	rm -f $(VENV)/.installed-* && touch $(STAMP)

# Every time (a second when all is there): the data cache lives outside .venv and may have been cleared.
data:
	bash scripts/install_data.sh

demo: $(STAMP) data
	$(VENV)/bin/fwdgrad demo

test: $(STAMP) data
	$(PY) -m pytest -n 2 -q

bench: $(STAMP) data
	$(PY) scripts/bench_engine.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/measure_ptq.py
	$(PY) scripts/measure_ptq.py --photos debian
	$(PY) scripts/measure_equalization.py
	$(PY) scripts/measure_sensitivity.py

clean-venv:
	rm -rf $(VENV)
