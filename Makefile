# Two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test,deepspeed,accelerate]"
	@rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(PY) launchers/demo.py --config configs/tiny.yaml --results-dir results/demo --overwrite

test: $(STAMP)
	DIT_WORKBOOK_SMOKE=1 $(PY) -m pytest tests notebooks --nbval-lax -q

clean:
	rm -rf results
