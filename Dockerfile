# syntax=docker/dockerfile:1
#
# mobykit as a container: `mobykit serve`, the Infrakit instance/flavor/group plugin, with the
# libvirt, AWS and GCP providers.
#
#   docker build -t mobykit .          (or: buildah bud --isolation chroot -t mobykit .)
#   docker run --init -d --name mobykit \
#       -v mobykit-run:/run/mobykit \
#       -v ~/.infrakit/plugins:/run/infrakit/plugins \
#       -v mobykit-state:/var/lib/mobykit \
#       -v ./mobykit.yml:/etc/mobykit/config.yml:ro -e MOBYKIT_CONFIG=/etc/mobykit/config.yml \
#       mobykit
#   docker exec mobykit mobykit group ls        (the client finds the server through $MOBYKIT_SERVER)
#
# Two stages: libvirt-python has no wheels and compiles against libvirt-dev, so the compiler and
# headers live only in the `build` stage; the final image gets the finished virtualenv and the
# runtime libraries (python3, libvirt0). Both stages use Debian's python3 (3.11), so the venv's
# interpreter path /usr/bin/python3 is the same in each.
#
# The cache mounts keep apt's downloads and pip's wheels between builds (BuildKit and buildah both
# honour them); they are never part of an image layer. apt's package lists are deliberately not
# cached: `apt-get update` deletes files it does not know in /var/lib/apt/lists, which includes
# the lock file buildah 1.28 (Debian 12's) keeps in a sharing=locked cache, and the next RUN using that
# cache then waits forever (containers/buildah#4342).

# ---- build: compile the wheels into /opt/mobykit -------------------------------------------------
FROM debian:bookworm-slim AS build
# The slim image's docker-clean hook deletes every .deb apt downloads, which would empty the cache
# mount; it is removed in this throwaway stage only.
RUN rm -f /etc/apt/apt.conf.d/docker-clean
RUN --mount=type=cache,id=mobykit-apt,target=/var/cache/apt,sharing=locked \
    apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev gcc libc6-dev pkg-config libvirt-dev ca-certificates
RUN python3 -m venv /opt/mobykit
# Only what the wheel is built from, so a change to tests or docs does not invalidate this layer.
COPY pyproject.toml README.md /src/
COPY plugin /src/plugin
COPY providers /src/providers
RUN --mount=type=cache,id=mobykit-pip,target=/root/.cache/pip \
    /opt/mobykit/bin/pip install --disable-pip-version-check "/src[plugin,libvirt,aws,gcp]"

# ---- final: runtime libraries + the venv, no compiler ------------------------------------------
FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="mobykit" \
      org.opencontainers.image.description="LinuxKit-style images and Infrakit groups: mobykit serve" \
      org.opencontainers.image.licenses="Apache-2.0"
# docker-clean is moved aside for the install (so the shared apt cache mount keeps its .debs) and
# put back, so images built FROM this one behave like any slim Debian image.
RUN --mount=type=cache,id=mobykit-apt,target=/var/cache/apt,sharing=locked \
    set -e; clean=/etc/apt/apt.conf.d/docker-clean; \
    if [ -e "$clean" ]; then mv "$clean" /tmp/docker-clean; fi; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 libvirt0 ca-certificates openssh-client xorriso; \
    if [ -e /tmp/docker-clean ]; then mv /tmp/docker-clean "$clean"; fi; \
    rm -rf /var/lib/apt/lists/*
# openssh-client: libvirt's qemu+ssh:// URIs, the usual way to reach a host's libvirtd from here.
# xorriso: the NoCloud config drive (user data) the libvirt provider attaches to each instance.
COPY --from=build /opt/mobykit /opt/mobykit

# A fixed unprivileged user: serving needs no root. Volume directories are created owned by it, so
# named volumes start out writable. To reach a host's qemu:///system socket instead of an ssh/tcp
# URI, run with --group-add <gid of the host's libvirt group>.
RUN groupadd --system --gid 10001 mobykit \
 && useradd --system --uid 10001 --gid mobykit --home-dir /var/lib/mobykit --shell /usr/sbin/nologin mobykit \
 && install -d -o mobykit -g mobykit -m 0755 /var/lib/mobykit /run/mobykit /run/infrakit/plugins

# MOBYKIT_CACHE: built images and pulled layers (the OCI layout mobykit caches into).
# INFRAKIT_PLUGINS_DIR: where serve puts its Infrakit JSON-RPC socket (named "mobykit"); mount the
#   host's ~/.infrakit/plugins there so an unmodified Infrakit finds the plugin.
# MOBYKIT_SERVER: the gRPC socket, so clients run in the container (docker exec) find the server.
ENV PATH=/opt/mobykit/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/mobykit \
    MOBYKIT_CACHE=/var/lib/mobykit/cache \
    INFRAKIT_PLUGINS_DIR=/run/infrakit/plugins \
    MOBYKIT_SERVER=unix:/run/mobykit/mobykit.sock

# /run/mobykit: the gRPC socket, shared with clients in other containers or on the host.
# /run/infrakit/plugins: Infrakit's plugin discovery directory.
# /var/lib/mobykit: the image cache and any state that should outlive the container.
VOLUME ["/run/mobykit", "/run/infrakit/plugins", "/var/lib/mobykit"]
WORKDIR /var/lib/mobykit
USER mobykit

# serve handles SIGTERM itself (letting calls in progress finish); run with --init so the
# processes it starts (xorriso, ssh for qemu+ssh://, drain commands) are reaped.
ENTRYPOINT ["mobykit"]
# The config file is optional: without one every provider uses its SDK's standard environment
# (LIBVIRT_DEFAULT_URI, AWS_*, GOOGLE_*). Mount one and point MOBYKIT_CONFIG at it, or override
# the command: `docker run ... mobykit serve --config /path/config.yml --listen ...`.
CMD ["serve", "--listen", "unix:/run/mobykit/mobykit.sock"]
