pytest_plugins = ["ciuic_common.testing"]
