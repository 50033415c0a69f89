"""A lab's computational experiment written for other parameter names than its campaign's."""


def yield_of(temperature):  # the campaign varies x1 and x2
    return {"y": temperature / 100}
