"""What the test suites share (importable as ``support`` through pytest.ini's pythonpath)."""
