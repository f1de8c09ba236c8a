# `make demo` trains a demo granja and scores a photo; `make test` runs the test suite.
# Both create .venv from requirements.txt first when it is missing or older than that file.
PYTHON ?= python3.11
VENV ?= .venv
DATA ?=
WEIGHTS ?=
EPOCHS ?= 20

.PHONY: demo test clean-venv

$(VENV)/.installed: requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python tools/demo.py --data "$(DATA)" --weights "$(WEIGHTS)" --epochs $(EPOCHS)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

clean-venv:
	rm -rf $(VENV)
