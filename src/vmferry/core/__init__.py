"""vmferry.core"""
