"""Helpers shared by the integration tests and the benchmarks.

- `tests.support.images` builds OCI and Docker schema2 images offline, in memory or
  as files, from Debian's static busybox.
- `tests.support.registry` runs Debian's ``docker-registry`` on loopback behind a small
  counting proxy, and pushes images to it.
"""

# Debian packages the support needs: docker-registry for Registry, busybox-static for
# the images, skopeo to cross-check them. Missing ones are setup failures, not skips.
APT_PACKAGES = ("docker-registry", "busybox-static", "skopeo")
