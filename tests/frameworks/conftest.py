# The record_*.py scripts need the frameworks they record (installed in their own virtualenvs, see
# each script's docstring), not the test environment: they are not collected.
collect_ignore_glob = ["*.py"]
