"""Functions for the secrets and replica-failure tests."""

import os


def read_secret(name):
    value = os.environ.get(name)
    print("the value is", value)
    return {"length": None if value is None else len(value), "agent_has_it": _agent_has(name)}


def leak_secret(name):
    raise ValueError(f"could not log in with {os.environ[name]}")


def uses_six():
    import six

    return {"six": six.__version__}


def _agent_has(name):
    """Whether the agent (this process's parent) has the variable in its environment."""
    with open(f"/proc/{os.getppid()}/environ", "rb") as environ:
        return any(
            entry.split(b"=", 1)[0] == name.encode() for entry in environ.read().split(b"\0")
        )
