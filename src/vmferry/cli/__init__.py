"""vmferry.cli"""
