"""flavor"""
