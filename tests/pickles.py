"""A pickle payload for the tests that prove kinema never unpickles code."""


class CodePayload:
    """Unpickling this would create a file: proof that code from the pickle ran."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))
