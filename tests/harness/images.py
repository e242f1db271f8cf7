"""Small real OCI images written straight into a mobykit Cache, for build tests.

Layers are real gzip'ed tars made with tarfile; configs and manifests are real OCI documents, so
the build reads them exactly as it reads pulled images.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from mobykit.image.cache import Cache

BUSYBOX = Path("/bin/busybox")


@dataclass
class Layer:
    """Files of one layer: path -> bytes (file), None (directory), or ("symlink", target)."""

    files: dict[str, object] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for path, value in self.files.items():
                info = tarfile.TarInfo(path)
                info.mtime = 1234567890
                if value is None:
                    info.type, info.mode = tarfile.DIRTYPE, self.modes.get(path, 0o755)
                    tf.addfile(info)
                elif isinstance(value, tuple):
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, value[1], 0o777
                    tf.addfile(info)
                else:
                    data = bytes(value)
                    info.size, info.mode = len(data), self.modes.get(path, 0o755)
                    tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()


def put_image(cache: Cache, ref: str, layers: list[Layer], *, config: dict | None = None,
              labels: dict[str, str] | None = None, arch: str = "amd64") -> str:
    """Write an image into ``cache`` under ``ref``; returns the manifest digest."""
    layer_descs, diff_ids = [], []
    for layer in layers:
        raw = layer.tar()
        blob = gzip.compress(raw, mtime=0)
        digest = cache.write_blob(blob)
        layer_descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": len(blob)})
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    inner = dict(config or {})
    if labels:
        inner["Labels"] = labels
    cfg = {"architecture": arch, "os": "linux", "config": inner, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cfg_bytes = json.dumps(cfg, sort_keys=True).encode()
    cfg_digest = cache.write_blob(cfg_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": len(cfg_bytes)},
        "layers": layer_descs,
    }
    man_bytes = json.dumps(manifest, sort_keys=True).encode()
    man_digest = cache.write_blob(man_bytes)
    cache.tag(ref, man_digest)
    return man_digest


def busybox_layer(extra: dict[str, object] | None = None) -> Layer:
    files: dict[str, object] = {"bin": None, "bin/busybox": BUSYBOX.read_bytes(), "bin/sh": ("symlink", "busybox"),
                                "etc": None, "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
                                "etc/group": b"root:x:0:\nnogroup:x:65534:\n"}
    files.update(extra or {})
    return Layer(files)


def standard_images(cache: Cache, order: tuple[str, ...] = ("kernel", "init", "svc")) -> dict[str, str]:
    """A kernel image (fake kernel bytes + a kernel.tar of one module), an init image and a
    service image with a LinuxKit label; written in ``order`` (cache order must not matter)."""
    modules = io.BytesIO()
    with tarfile.open(fileobj=modules, mode="w") as tf:
        for path, data in (("lib/modules/6.1.0-test/kernel/fake.ko", b"\x7fELF fake module"),):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    makers = {
        "kernel": lambda: put_image(cache, "example.test/kernel:1", [Layer({"kernel": b"\xfaKERNEL" * 4096, "kernel.tar": modules.getvalue()})]),
        "init": lambda: put_image(cache, "example.test/init:1", [busybox_layer({"init": b"#!/bin/sh\necho init\n"})]),
        "svc": lambda: put_image(
            cache, "example.test/svc:1", [busybox_layer(), Layer({"usr": None, "usr/bin": None, "usr/bin/svc": b"#!/bin/sh\necho svc\n"})],
            config={"Entrypoint": ["/usr/bin/svc"], "Env": ["PATH=/usr/bin:/bin"]},
            labels={"org.mobyproject.config": json.dumps({"capabilities": ["CAP_NET_BIND_SERVICE"], "net": "host"})},
        ),
    }
    return {name: makers[name]() for name in order}


SPEC = """\
kernel:
  image: example.test/kernel:1
  cmdline: "console=ttyS0"
init:
  - example.test/init:1
onboot:
  - name: first
    image: example.test/svc:1
    command: ["/bin/echo", "hello"]
services:
  - name: svc
    image: example.test/svc:1
onshutdown:
  - name: bye
    image: example.test/init:1
    command: ["/bin/echo", "bye"]
files:
  - path: etc/motd
    contents: "welcome\\n"
    mode: "0644"
  - path: /etc/app/config.json
    source: app.json
"""
