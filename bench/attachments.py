#!/usr/bin/env python3
"""CPU cost of the attachment blocker (fuglu_plugins/attachment.py).

Targets from issue 6:
* a 10 MB message with 20 attachments is checked in <= 50 ms CPU;
* an archive bomb is refused in <= 100 ms CPU.

Measured in-process with time.process_time() around FiletypePlugin.examine(), after one
warm-up run (rule files parsed, mimetypes initialised); the median of --runs runs is
reported, with the worst run. Peak memory of one run is taken with tracemalloc (Python
allocations, which include every decompressed buffer).

The messages are those of tests/test_attachment.py (same builders). For comparison the
cost of parsing the same 10 MB message with the email package is shown: that parse is
what the plugin avoids by walking the MIME structure on the raw bytes.

    python3 bench/attachments.py [--runs 15] [--markdown]
"""

import argparse
import logging
import os
import platform
import statistics
import sys
import time
import tracemalloc

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
sys.path.insert(0, os.path.join(REPO_DIR, 'tests'))

import fuglu  # noqa: E402
import test_attachment as corpus  # noqa: E402


def plugin_with(**options):
    confdir = os.path.join(REPO_DIR, 'conf')
    return corpus.make_plugin(confdir, sendbounce='False', **options)


def measure(function, runs):
    function()  # warm-up
    times = []
    for _ in range(runs):
        started = time.process_time()
        function()
        times.append(time.process_time() - started)
    tracemalloc.start()
    try:
        function()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return statistics.median(times) * 1000, max(times) * 1000, peak / 1048576


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=int, default=15)
    parser.add_argument('--markdown', action='store_true',
                        help='print a table for bench/RESULTS.md')
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the refused bombs log a warning each run

    big = corpus.big_mail()
    rows = []

    def row(label, source, plugin, expect):
        suspect_result = {}

        def run():
            suspect = fuglu.Suspect('sender@example.net', ['rcpt@example.org'], source)
            result = plugin.examine(suspect)
            suspect_result['code'] = result[0] if isinstance(result, tuple) else result
        median, worst, peak = measure(run, args.runs)
        assert suspect_result['code'] == expect, (label, suspect_result)
        rows.append((label, '%.1f MB' % (len(source) / 1048576.0), median, worst, peak,
                     fuglu.actioncode_to_string(expect)))

    row('10 MB, 20 attachments, names + types (defaults)', big, plugin_with(), fuglu.DUNNO)
    row('10 MB, 20 attachments, + archive names and content', big,
        plugin_with(checkarchivenames='True', checkarchivecontent='True'), fuglu.DUNNO)
    row('10 MB, 20 attachments, + archive nesting level 3', big,
        plugin_with(checkarchivenames='True', checkarchivecontent='True', archiveextractlevel='3'),
        fuglu.DUNNO)
    bomb_plugin = plugin_with(checkarchivenames='True', checkarchivecontent='True',
                              archiveextractlevel='3')
    labels = {'zip': 'zip bomb (200 MB of zeros)', 'gz': 'gzip bomb (200 MB)',
              'bz2': 'bzip2 bomb (200 MB)',
              'xz': 'xz bomb (200 MB)', 'nested': 'zip of 10 zip bombs (20 MB each)',
              'members': 'zip with 5000 members'}
    for kind, label in labels.items():
        name, data = corpus.bomb(kind)
        row('%s, refused' % label, corpus.mail((name, data)), bomb_plugin, fuglu.DELETE)

    import email
    from email import policy

    def parse_with_email_package():
        message = email.message_from_bytes(big, policy=policy.compat32)
        for part in message.walk():
            part.get_filename()
    median, worst, peak = measure(parse_with_email_package, max(3, args.runs // 3))
    rows.append(('(comparison) email package parse of the 10 MB message',
                 '%.1f MB' % (len(big) / 1048576.0),
                 median, worst, peak, '-'))

    header = ('check', 'message', 'CPU ms median', 'CPU ms worst', 'peak MiB', 'result')
    if args.markdown:
        print('| %s |' % ' | '.join(header))
        print('|%s|' % '|'.join(['---'] * len(header)))
        for label, size, median, worst, peak, result in rows:
            print('| %s | %s | %.1f | %.1f | %.1f | %s |' % (label, size, median, worst, peak,
                                                             result))
    else:
        for label, size, median, worst, peak, result in rows:
            print('%-60s %8s %8.1f ms %8.1f ms %7.1f MiB  %s' % (label, size, median, worst, peak,
                                                                 result))
    print()
    print('python %s on %s, %s, %d runs, type detection: %s' % (
        platform.python_version(), platform.machine(), platform.platform(terse=True), args.runs,
        corpus.attachment.type_detection_name()))


if __name__ == '__main__':
    main()
