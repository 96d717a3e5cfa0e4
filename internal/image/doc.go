// Package image builds and caches the default guest image of a sandbox: a
// kernel and an initramfs that boots straight into the smolvm guest agent.
//
// The kernel comes from Debian's linux-image-cloud-amd64 package (fetched with
// apt-get download and unpacked with dpkg-deb) or from a caller supplied file.
// Only the kernel modules the guest needs (virtio transports, console, block,
// net, rng, vsock, overlay) are kept, decompressed and ordered so that every
// module comes after its dependencies.
//
// The initramfs is an uncompressed newc cpio archive written in Go. It holds
// the agent as /init, a static busybox with one symlink per applet, the modules
// under /lib/modules, the load order in /etc/smolvm/modules and a handful of
// minimal /etc files. Archives are cached under a fingerprint of everything
// that went into them, so EnsureDefault is cheap once the cache is warm.
package image
