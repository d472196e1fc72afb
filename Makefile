# The two set-up commands of the README: `make serve` and `make test`.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: install serve test test-slow

install:
	@./scripts/install.sh

serve: install
	$(VENV)/bin/coe serve

# pytest exits 5 when it collected no test: that is a failure here, never a pass.
test: install
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

test-slow: install
	$(VENV)/bin/python -m pytest -m slow $(PYTEST_ARGS)
