"""What mobykit keeps on a domain: ``<mobykit:instance>`` in the domain's ``<metadata>``.

Why on the domain: tags are the only state (see ``mobykit.providers.base``), so a restarted plugin,
or a second one on the same daemon, lists exactly what the first one made.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from mobykit.providers.libvirt.binding import libvirt

NS = "https://mobykit.dev/xmlns/libvirt/instance/1"
NS_PREFIX = "mobykit"


@dataclass
class InstanceMeta:
    """The metadata of one instance; attributes and ``<tag>``/``<volume>``/``<port>`` children."""

    tags: dict[str, str]
    logical_id: str | None
    image: str | None
    created: int  # ns since the epoch
    volumes: list[str]
    pool: str
    # (proto, guest port, host port on 127.0.0.1)
    ports: list[tuple[str, int, int]] = field(default_factory=list)
    creating: bool = False  # create() has not finished with the domain yet

    def _attributes(self) -> dict[str, str]:
        attrs = {"created": str(self.created), "pool": self.pool}
        if self.creating:
            attrs["creating"] = "1"
        if self.logical_id is not None:
            attrs["logical-id"] = self.logical_id
        if self.image:
            attrs["image"] = self.image
        return attrs

    def _fill(self, root: ET.Element, qualify: str) -> ET.Element:
        for k in sorted(self.tags):
            ET.SubElement(root, f"{qualify}tag", key=k).text = self.tags[k]
        for v in self.volumes:
            ET.SubElement(root, f"{qualify}volume").text = v
        for proto, guest, host in self.ports:
            ET.SubElement(root, f"{qualify}port", proto=proto, guest=str(guest), host=str(host))
        return root

    def element(self) -> ET.Element:
        """Namespaced, for the ``<metadata>`` of a domain XML that defineXML receives."""
        return self._fill(ET.Element(f"{{{NS}}}instance", self._attributes()), f"{{{NS}}}")

    def xml(self) -> str:
        """Unqualified XML for setMetadata, which adds the namespace itself."""
        return ET.tostring(self._fill(ET.Element("instance", self._attributes()), ""), encoding="unicode")

    @classmethod
    def parse(cls, text: str) -> InstanceMeta:
        root = ET.fromstring(text)

        def local(el: ET.Element) -> str:
            return el.tag.rsplit("}", 1)[-1]

        tags = {el.get("key", ""): el.text or "" for el in root if local(el) == "tag"}
        volumes = [el.text or "" for el in root if local(el) == "volume"]
        ports = [(el.get("proto", "tcp"), int(el.get("guest", "0")), int(el.get("host", "0")))
                 for el in root if local(el) == "port"]
        return cls(tags=tags, logical_id=root.get("logical-id"), image=root.get("image"),
                   created=int(root.get("created", "0")), volumes=volumes, pool=root.get("pool", ""),
                   ports=ports, creating=root.get("creating") == "1")


def read_meta_text(dom: Any) -> str | None:
    """The domain's raw ``<mobykit:instance>`` XML, or None when it has none (not ours) or is gone.
    Other libvirt errors are raised."""
    lv = libvirt()
    try:
        return dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, NS, 0)
    except lv.libvirtError as e:
        if e.get_error_code() in (lv.VIR_ERR_NO_DOMAIN_METADATA, lv.VIR_ERR_NO_DOMAIN):
            return None
        raise


def read_meta(dom: Any) -> InstanceMeta | None:
    """The domain's parsed metadata, or None when it is not a mobykit instance (or is gone)."""
    text = read_meta_text(dom)
    return None if text is None else InstanceMeta.parse(text)


def write_meta(dom: Any, meta: InstanceMeta, flags: int) -> None:
    """Replace the domain's metadata (``flags``: VIR_DOMAIN_AFFECT_*)."""
    lv = libvirt()
    dom.setMetadata(lv.VIR_DOMAIN_METADATA_ELEMENT, meta.xml(), NS_PREFIX, NS, flags)
