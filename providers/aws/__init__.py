"""Machines as EC2 instances, booted from AMIs that mobykit publishes itself (boto3).

Why the design is what it is:
- Properties keep Infrakit's AWS plugin shape (``{RunInstancesInput, Tags, Region}``, plus the
  ``Image`` the moby flavor writes), so an Infrakit user's instance properties carry over; every
  ``RunInstancesInput`` field is checked against botocore's EC2 service model (``properties``).
- A built image becomes an AMI once per image id (``publish``): its ``aws`` disk is uploaded with
  the EBS direct APIs (512 KiB blocks with SHA256 checksums, in parallel, zero blocks skipped;
  ``blocks``), registered as an hvm/ENA AMI; the snapshot and the AMI carry the tag
  ``mobykit.image`` and are found again by it, by any server.
- Tags are the only state (``instances``): RunInstances tags at launch, listings filter on the
  server (the tags, states pending and running), the console is GetConsoleOutput. A group's
  stopped instances are no members and are terminated (``AWSProvider.reap``); this server's own
  launches are listed until EC2's eventually consistent listings show them (``recent``); a group's
  consoles are read while its listing runs (``console``).
- Credentials, region and endpoint come from boto3's standard chain; every call goes through
  botocore's ``adaptive`` retry mode and its waiters (``clients``).

Config (``providers.aws``): ``Region``, ``Import`` (``ebs``, default, or ``s3``), ``Bucket`` (for
``s3``); ``NamespaceTags`` is kept by the core. Region per instance: ``Properties.Region``.
"""

from __future__ import annotations

from mobykit.providers.aws.properties import CONFIG_KEYS, IMAGE_TAG, LOGICAL_ID_TAG, PROPERTY_KEYS
from mobykit.providers.aws.provider import AWSProvider

__all__ = ["AWSProvider", "CONFIG_KEYS", "IMAGE_TAG", "LOGICAL_ID_TAG", "PROPERTY_KEYS"]
