#!/bin/sh
# stand-in for the test case write.sh
echo data > /vola/file
