"""A class loaded once per replica: its constructor runs in the agent, before any fork."""

import os


class Model:
    def __init__(self, factor, label="m"):
        self.factor = factor
        self.label = label
        self.loaded_in = os.getpid()
        self.calls = 0

    def compute(self, x):
        # Each execution runs in a forked child: `calls` never grows past 1 in the parent.
        self.calls += 1
        return {
            "loaded_in": self.loaded_in,
            "value": x * self.factor,
            "label": self.label,
            "ran_in": os.getpid(),
            "calls": self.calls,
        }
