"""``mobykit run qemu NAME``: boot a build locally (LinuxKit's ``linuxkit run qemu``): any bootable
output format, the first NAME has unless ``--format`` names one (``mobykit.run.media``).

With ``--until-ready`` it is a boot check for scripts and CI: exit 0 when the init prints its
readiness line, non-zero with the console tail when it reports "not ready" or the timeout passes.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _terminate(signum, frame) -> None:
    # qemu runs in its own session (so a terminal's Ctrl-C reaches us, not it); turn SIGTERM into
    # an exception so the cleanup that kills qemu by PID and removes the cidata ISO still runs.
    # Later SIGTERMs are ignored: `timeout` sends one to the command and one to its process group,
    # and a second exception raised inside the cleanup would cut it short.
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _qemu(args) -> int:
    import signal

    from mobykit.errors import InvalidArgument
    from mobykit.run import media, qemu

    signal.signal(signal.SIGTERM, _terminate)

    if args.data is not None and args.data_file is not None:
        raise InvalidArgument("--data and --data-file: give one or the other")
    data = None
    if args.data is not None:
        data = args.data.encode()
    elif args.data_file is not None:
        try:
            data = Path(args.data_file).read_bytes()
        except OSError as e:
            raise InvalidArgument(f"--data-file {args.data_file}: {e.strerror}") from None
    if args.until_ready and args.timeout is None:
        args.timeout = 600.0  # a boot check must end: a guest that hangs silently never says "not ready"
    opts = qemu.RunOptions(
        cpus=args.cpus, mem=args.mem, accel=args.accel, data=data,
        console_log=Path(args.console_log) if args.console_log else None,
        publish=list(args.publish or []), timeout=args.timeout, until_ready=args.until_ready,
    )  # fmt: skip
    output = media.find(args.name, args.format)  # before any VM: a missing or unbootable format exits 2
    if not args.until_ready and not args.console_log and sys.stdin.isatty():
        # interactive: qemu owns the terminal (Ctrl-A X quits)
        return qemu.run_attached(output, opts)
    with qemu.QemuVM(output, opts, echo=None if args.until_ready else sys.stdout.buffer) as vm:
        out = vm.wait(opts.timeout, until_ready=opts.until_ready)
    if out.reason == "ready":
        print(f"mobykit: {args.name}: ready {out.image_id}")
        return 0
    if out.reason == "exited" and not args.until_ready:
        return out.exit_code
    why = {"not ready": "the guest reported not ready", "timeout": f"no readiness line within {args.timeout} s",
           "exited": f"qemu exited (code {out.exit_code}) before the guest was ready"}[out.reason]
    print(f"mobykit: run qemu {args.name}: {why}; console tail:\n{out.tail}", file=sys.stderr)
    return out.exit_code


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="boot a built image locally")
    sub = p.add_subparsers(dest="run_command", metavar="BACKEND")
    q = sub.add_parser("qemu", help="boot a build (any bootable output format) in qemu")
    q.add_argument("name", metavar="NAME", help="build prefix, e.g. out/minimal (files NAME-kernel, NAME.iso, NAME.qcow2, ...)")
    q.add_argument("-f", "--format", metavar="FORMAT",
                   help="the output format to boot (default: the first bootable one NAME.json lists, "
                        "kernel+initrd first); ISOs boot as a CD-ROM, disks read-only (snapshot), "
                        "-efi formats with OVMF")
    q.add_argument("--cpus", type=int, default=1, help="virtual CPUs (default 1; more is slower under TCG)")
    q.add_argument("--mem", default="512M", help="memory, e.g. 512M or 1G (default 512M)")
    q.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto", help="default auto: KVM only if a probe boot works")
    q.add_argument("--data", help="user data, served to the guest on a cidata ISO")
    q.add_argument("--data-file", help="file whose contents are the user data")
    q.add_argument("--console-log", help="also write the serial console to this file")
    q.add_argument("--publish", action="append", metavar="HOST:GUEST", help="forward tcp 127.0.0.1:HOST to the guest's GUEST port (repeatable)")
    q.add_argument("--timeout", type=float, help="seconds before qemu is killed (exit 124; default 600 with --until-ready, else none)")
    q.add_argument("--until-ready", action="store_true", help="exit 0 at 'mobykit: ready', non-zero at 'not ready' or timeout")
    q.set_defaults(func=_qemu)
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])
