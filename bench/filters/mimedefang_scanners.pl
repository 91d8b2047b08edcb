# -*- Perl -*-
# Benchmark filter "scanners" for MIMEDefang: clamd, then spamd, on every message.
# clamd through MIMEDefang's own message_contains_virus_clamd (SCAN of the decoded
# parts in ./Work), spamd through SpamAssassin's own client (Mail::SpamAssassin::Client,
# REPORT, as defang asks).  A virus is bounced (554), a failed scan tempfailed, every
# message gets X-Spam-Status.  The same work as bench/filters/defang_scanners.py.
# @CLAMD_SOCKET@ and @SPAMD_PORT@ are filled in by scripts/bench_scanners.py.
use Mail::SpamAssassin::Client;

$ClamdSock = "@CLAMD_SOCKET@";

sub filter_end {
    my($entity) = @_;
    my($code, $category, $action) = message_contains_virus_clamd();
    if ($action eq 'tempfail') {
        return action_tempfail("Virus scan unavailable");
    }
    if ($category eq 'virus') {
        return action_bounce("Virus found: $VirusName", 554, "5.7.1");
    }
    open(my $in, '<', './INPUTMSG') or return action_tempfail("no INPUTMSG");
    my $message = do { local $/; <$in> };  # $/ restored: the client reads lines
    close($in);
    my $client = Mail::SpamAssassin::Client->new({host => '127.0.0.1', port => @SPAMD_PORT@});
    my $result = $client->spam_report($message);
    if (!$result || !defined($result->{score})) {
        return action_tempfail("Spam scan unavailable");
    }
    my $flag = ($result->{isspam} eq 'True') ? 'Yes' : 'No';
    action_add_header("X-Spam-Status", "$flag, score=$result->{score} required=$result->{threshold}");
}
1;
