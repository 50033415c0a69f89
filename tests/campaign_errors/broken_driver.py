"""A lab driver whose vendor SDK is not installed: importing it fails (used by the error corpus)."""

import vendor_sdk_that_is_not_installed  # noqa: F401


def SpinCoater(**options):
    raise AssertionError("never called: the import fails first")
