"""images layer: OCI pulls, the content-addressed cache, per-VM qcow2 overlays and UEFI firmware
for full guest images; used by the vm layer (docs/ARCHITECTURE.md).

Modules, pure cores first:

* ``reference`` — ``parse_reference`` (``registry/repository[:tag|@sha256:digest]``), ``Digest``.
* ``manifest`` — manifest/index parsing, ``select_layout`` (scottjg/qemu-vfio-apple's layout or
  a plain qcow2), ``parse_metadata`` (that layout's JSON layer).
* ``auth`` — WWW-Authenticate challenges, credentials from podman/docker auth files.
* ``qcow2`` — the qcow2 header's backing-file name (which base an overlay uses).
* ``registry`` — ``RegistryClient``: token auth, retries, resumable verified blob downloads,
  every body bounded and stall-watched through ``egpu.transfer``.
* ``store`` — ``ImageStore``: blobs by digest, one record per reference, ``images``/``prune``;
  ``overlay_bases`` maps VM directories to the bases their overlays use.
* ``pull`` — ``pull(ref)`` and ``resolve_cached(ref)``; ``DEFAULT_IMAGE``.
* ``overlay`` — qemu-img argv builders and ``ensure_overlay`` (create / keep / safe rebase).
* ``disk`` — ``plan_boot_disk`` / ``prepare_boot_disk``: what ``run --image/--base`` calls.
* ``firmware`` — ``find_firmware`` (edk2 code + vars template), ``ensure_vars`` (per-VM copy).
* ``profiles`` — ``image build``'s profiles, ``--with nvidia`` steps, requests and cache key (pure).
* ``rootfs`` — .deb files merged into one root-owned tar stream without dpkg or root.
* ``builder`` — the builder VM's ``init.sh`` and the chroot's ``stage2.sh`` (package data).

Nothing here prints: progress goes to an ``egpu.progress.Progress``, failures are ImageError.
"""
