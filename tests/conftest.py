"""Shared pytest configuration: QEMU fixtures (tests marked qemu skip when QEMU is missing)."""

pytest_plugins = ["tests.qemu_fixtures"]
