"""vmferry.qemu"""
