pytest_plugins = ["tests.fix_proxy", "tests.fix_pgcluster", "tests.fix_service"]
