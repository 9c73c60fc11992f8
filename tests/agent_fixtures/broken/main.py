print("importing a module that cannot load")
raise RuntimeError("boom at import")


def never():
    return None
