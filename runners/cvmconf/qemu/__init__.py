"""QEMU runner: boots a kernel under test with an initramfs holding busybox, the suite binaries
and cvm-agent, and runs batches inside the guest over a virtio-serial port."""
