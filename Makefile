# Two commands: `make demo` and `make test`. Both create .venv on first use.
# Chapters: `make lab` opens them in JupyterLab; `make sync` pairs each notebooks/NN_name.py with its .ipynb;
# `make notebooks` (or `make notebooks CH=07`) re-executes chapters in place at full size.
# `make book`: the offline website of every chapter (build/book/index.html), from the committed notebooks.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
CH     ?=

.PHONY: demo test venv lab sync notebooks book clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test,deepspeed,accelerate,notebooks,onnx,book]"
	@rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(PY) launchers/demo.py --config configs/tiny.yaml --results-dir results/demo --overwrite

test: $(STAMP)
	DIT_WORKBOOK_SMOKE=1 $(PY) -m pytest tests notebooks --nbval-lax -q

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

sync: $(STAMP)
	$(VENV)/bin/jupytext --sync notebooks/[0-9]*.py

# Full size (the committed outputs): DIT_WORKBOOK_SMOKE is unset on purpose. Chapter 07 takes ~25 min on 2 cores.
notebooks: $(STAMP)
	@set -e; for f in notebooks/$(CH)*.py; do case $$f in notebooks/[0-9]*) ;; *) continue;; esac; \
	  echo "== $$f"; env -u DIT_WORKBOOK_SMOKE $(VENV)/bin/jupytext --sync --execute $$f; done

# Sphinx + myst-nb over the executed notebooks (nothing re-runs) and the reference pages; ~20 s on 2 cores.
book: $(STAMP)
	$(PY) tools/build_book.py

clean:
	rm -rf results
