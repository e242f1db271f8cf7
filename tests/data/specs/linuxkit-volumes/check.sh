#!/bin/sh
# stand-in for the test case check.sh: the volume is there
[ -d /vola ]
