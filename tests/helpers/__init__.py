"""Helpers shared by test modules: plain modules, imported as ``helpers.<module>`` from any
test directory (pyproject.toml puts tests/ on pytest's pythonpath). Fixtures stay in the
conftest.py files; they may use these."""
