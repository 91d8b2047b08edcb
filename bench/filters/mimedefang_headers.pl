# -*- Perl -*-
# Benchmark filter "headers" for MIMEDefang: walk every part, count them, add
# X-Scanned with the count, bounce (5xx at end of DATA) a *.exe attachment.
# The same work as bench/filters/defang_headers.py.
my $parts = 0;

sub filter_begin {
    my($entity) = @_;
    $parts = 0;
}

sub filter_multipart {
    my($entity, $fname, $ext, $type) = @_;
    $parts++;
    return action_accept();
}

sub filter {
    my($entity, $fname, $ext, $type) = @_;
    $parts++;
    if (lc($fname) =~ /\.exe$/) {
        return action_bounce("No executables", 554, "5.7.1");
    }
    return action_accept();
}

sub filter_end {
    my($entity) = @_;
    action_add_header("X-Scanned", "parts=$parts");
}
1;
