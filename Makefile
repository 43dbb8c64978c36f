# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml scripts/install_weights.sh scripts/install_data.sh | cksum | cut -d' ' -f1)

.PHONY: demo test bench clean-venv

$(STAMP): pyproject.toml scripts/install_weights.sh scripts/install_data.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	VENV=$(VENV) bash scripts/install_weights.sh
	bash scripts/install_data.sh
	rm -f $(VENV)/.installed-* && touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fwdgrad demo

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

bench: $(STAMP)
	$(PY) scripts/bench_engine.py

clean-venv:
	rm -rf $(VENV)
