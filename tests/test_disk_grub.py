"""The GRUB EFI loader's embedded config passes the spec's kernel command line unchanged."""

from __future__ import annotations

import shlex

import pytest

from mobykit.image.disk import grub


@pytest.mark.parametrize("cmdline", ["console=ttyS0", 'console=ttyS0 foo="a b" x=$y; it\'s {z}', ""])
def test_cmdline_reaches_the_kernel_as_one_word(cmdline):
    cfg = grub.config(cmdline, marker="/boot/mobykit-x")
    line = next(ln for ln in cfg.splitlines() if ln.startswith("linux "))
    words = shlex.split(line)  # GRUB quotes words as sh does: '...' is literal
    assert words[:2] == ["linux", "/boot/kernel"]
    assert " ".join(words[2:]) == cmdline


def test_root_argument_is_appended_after_the_spec_cmdline():
    cfg = grub.config("console=ttyS0", marker="/m", root_arg="root=/dev/sr0")
    line = next(ln for ln in cfg.splitlines() if ln.startswith("linux "))
    assert shlex.split(line)[2] == "console=ttyS0 root=/dev/sr0"
