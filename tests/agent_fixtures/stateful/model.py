"""A class-based module: __init__ runs once per replica, executions run in forked children."""

import os


class Runner:
    inits = 0

    def __init__(self, greeting, weights=3):
        Runner.inits += 1
        self.greeting = greeting
        self.weights = list(range(weights))
        self.loaded_in = os.getpid()
        self.calls = 0

    def hello(self, name):
        self.calls += 1
        return f"{self.greeting}, {name}"

    def state(self):
        self.calls += 1
        return {
            "inits": Runner.inits,
            "instance": id(self),
            "loaded_in": self.loaded_in,
            "agent": os.getppid(),
            "calls": self.calls,
            "weights": self.weights,
            "pid": os.getpid(),
        }
