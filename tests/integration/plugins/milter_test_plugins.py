"""Test plugins for the milter integration tests (plugindir = this folder).

HeaderDriven does what the message's own X-Test-* headers ask, so one running fuglu
serves every test case:

    X-Test-Verdict: ACTION [message]   return ACTION (DUNNO, ACCEPT, DELETE, REJECT, DEFER)
    X-Test-Sender: address             change the envelope sender
    X-Test-Add-Rcpt: address           add an envelope recipient
    X-Test-Remove-Rcpt: address        remove an envelope recipient
    X-Test-Body: text                  replace the body with text + CRLF
    X-Test-Subject: text               replace the Subject header
"""

from fuglu.shared import ScannerPlugin, DUNNO, string_to_actioncode


class HeaderDriven(ScannerPlugin):

    def examine(self, suspect):
        header = suspect.get_header
        sender = header('X-Test-Sender')
        if sender:
            suspect.from_address = sender
        removed = header('X-Test-Remove-Rcpt')
        if removed:
            suspect.recipients = [r for r in suspect.recipients if r != removed]
        added = header('X-Test-Add-Rcpt')
        if added:
            suspect.recipients = suspect.recipients + [added]
        subject = header('X-Test-Subject')
        if subject:
            suspect.set_header('Subject', subject)
        body = header('X-Test-Body')
        if body:
            source = suspect.get_source()
            end = source.find(b'\r\n\r\n')
            suspect.set_source(source[:end + 4] + body.encode('utf-8') + b'\r\n')
        verdict = header('X-Test-Verdict')
        if not verdict:
            return DUNNO
        action, _, message = verdict.partition(' ')
        self.logger.info('%s: verdict %s from the X-Test-Verdict header', suspect.id, action)
        return string_to_actioncode(action), message or None
