"""Experiments: reproduce published ballooning results on real hosts, one command each.

The shipped definitions are the ``*.toml`` files of this package (package data);
``spec`` parses them, ``trial`` runs one trial, ``runner`` runs grids of trials on a local
or a Dask executor and stores their results, ``report`` turns stored results into tables and
plots, and ``commands`` is the ``balloonlab experiment`` / ``balloonlab sweep`` CLI.
"""
