"""vmferry.lab"""
