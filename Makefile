# Shortcuts for the two commands in README.md (which need only Python).
.PHONY: run test
run:
	python3 dev.py run
test:
	python3 dev.py test
