"""vmferry.guest"""
