"""VPGTrans transfer: token pairing, embedding converters, projector merge and source loading."""
