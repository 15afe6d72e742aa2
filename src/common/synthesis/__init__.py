"""Notebook 06: experiments that link the three papers, and their figures. Imports the core and the paper
packages."""
