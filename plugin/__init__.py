"""mobykit: LinuxKit-style specs to immutable images, and groups of machines kept on them.

The package is laid out as the pipeline runs: ``spec`` (YAML -> validated model) -> ``image``
(sources -> one canonical tar -> output formats) -> ``providers`` (where machines run), with the
Infrakit SPI in ``spi``, its one implementation in ``core``, and thin transports in ``rpc``.
"""

__version__ = "0.1.0"
