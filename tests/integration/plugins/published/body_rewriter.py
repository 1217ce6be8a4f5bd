# Style: get_message_rep() / set_message_rep() replacing the message (a footer).
from fuglu.shared import ScannerPlugin, DUNNO


class BodyRewriter(ScannerPlugin):
    def examine(self, suspect):
        message = suspect.get_message_rep()
        if message.is_multipart() or not suspect.get_header('X-Add-Footer'):
            return DUNNO
        message.set_payload(message.get_payload() + '-- \r\nscanned by fuglu\r\n')
        message['X-Footer-Added'] = 'yes'
        suspect.set_message_rep(message)
        return DUNNO
