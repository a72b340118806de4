"""Choosing the student: device profiles, the one timing routine, the candidate pool measured in its deployment
form, the selection rule, and probe packs for devices edgekd cannot run on."""
