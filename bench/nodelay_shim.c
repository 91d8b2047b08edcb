/*
 * LD_PRELOAD shim for scripts/bench's inet investigation: sets TCP_NODELAY on the
 * TCP milter connection, on whichever side it is preloaded into.
 *
 *   NODELAY_PORT=<milter port>  (required; any other socket is left alone)
 *   accept()/accept4(): an accepted socket whose local port is NODELAY_PORT
 *                       (the milter side: libmilter accepts the MTA's connection)
 *   connect():          a socket connecting to NODELAY_PORT (the MTA side: smtpd)
 *   NODELAY_QUICKACK=1: on the accepted sockets, also re-arm TCP_QUICKACK after every
 *                       read()/recv() (the kernel clears it again): the milter ACKs each
 *                       segment of the MTA at once instead of delaying the ACK, so the
 *                       MTA's Nagle-held next write goes out without waiting.  Milter side
 *                       only; needs no change in the MTA.
 *   NODELAY_OFF=1:      skip TCP_NODELAY (to test QUICKACK alone).
 *   NODELAY_SHIM_LOG=1: one line on stderr per socket changed.
 *
 * Compiled by scripts/bench at run time (gcc -shared -fPIC -O2 -ldl); never committed
 * as a binary.  Why a shim and not a patch: libmilter and Postfix own these sockets
 * and set no TCP_NODELAY; the shim shows what the option alone changes.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static int wanted_port(void) {
    const char *p = getenv("NODELAY_PORT");
    return p ? atoi(p) : -1;
}

#define MAXFD 65536
static unsigned char quick[MAXFD]; /* accepted milter sockets that get TCP_QUICKACK */

static void quickack(int fd) {
    int one = 1;
    if (fd >= 0 && fd < MAXFD && quick[fd])
        setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
}

static void set_nodelay(int fd, const char *why) {
    int one = 1, rc = 0;
    if (getenv("NODELAY_QUICKACK") && fd < MAXFD && why[0] == 'a') {
        quick[fd] = 1;
        quickack(fd);
    }
    if (!getenv("NODELAY_OFF"))
        rc = setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (getenv("NODELAY_SHIM_LOG"))
        fprintf(stderr, "nodelay_shim: pid %d fd %d (%s): TCP_NODELAY rc=%d\n",
                (int)getpid(), fd, why, rc);
}

static int port_of(const struct sockaddr *sa) {
    if (sa->sa_family == AF_INET)
        return ntohs(((const struct sockaddr_in *)sa)->sin_port);
    if (sa->sa_family == AF_INET6)
        return ntohs(((const struct sockaddr_in6 *)sa)->sin6_port);
    return -1;
}

static void after_accept(int fd) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (fd < 0 || getsockname(fd, (struct sockaddr *)&ss, &len) != 0)
        return;
    if (port_of((struct sockaddr *)&ss) == wanted_port())
        set_nodelay(fd, "accept");
}

int accept(int s, struct sockaddr *addr, socklen_t *len) {
    static int (*real)(int, struct sockaddr *, socklen_t *);
    if (!real)
        real = dlsym(RTLD_NEXT, "accept");
    int fd = real(s, addr, len);
    after_accept(fd);
    return fd;
}

int accept4(int s, struct sockaddr *addr, socklen_t *len, int flags) {
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real)
        real = dlsym(RTLD_NEXT, "accept4");
    int fd = real(s, addr, len, flags);
    after_accept(fd);
    return fd;
}

int connect(int s, const struct sockaddr *addr, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real)
        real = dlsym(RTLD_NEXT, "connect");
    if (addr && (addr->sa_family == AF_INET || addr->sa_family == AF_INET6)
        && port_of(addr) == wanted_port())
        set_nodelay(s, "connect");
    return real(s, addr, len);
}

ssize_t read(int fd, void *buf, size_t n) {
    static ssize_t (*real)(int, void *, size_t);
    if (!real)
        real = dlsym(RTLD_NEXT, "read");
    ssize_t r = real(fd, buf, n);
    if (r > 0 && fd >= 0 && fd < MAXFD && quick[fd])
        quickack(fd);
    return r;
}

ssize_t recv(int fd, void *buf, size_t n, int flags) {
    static ssize_t (*real)(int, void *, size_t, int);
    if (!real)
        real = dlsym(RTLD_NEXT, "recv");
    ssize_t r = real(fd, buf, n, flags);
    if (r > 0 && fd >= 0 && fd < MAXFD && quick[fd])
        quickack(fd);
    return r;
}

int close(int fd) {
    static int (*real)(int);
    if (!real)
        real = dlsym(RTLD_NEXT, "close");
    if (fd >= 0 && fd < MAXFD)
        quick[fd] = 0;
    return real(fd);
}
