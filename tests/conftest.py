pytest_plugins = ["tests.fix_proxy"]
