/*
 * images/linux/init-min.c: /init of the minimal initramfs (initramfs-min.cpio).
 *
 * A freestanding static x86_64 program, no libc: prints the skiff-init marker
 * to the console and powers the VM off. It keeps the initramfs a few KiB,
 * which matters where guest kernel code is emulated (PVM): the kernel copies
 * every initramfs byte in kernel mode, and the 2 MiB busybox archive costs
 * over a minute there. Built by build.sh with -nostdlib -static.
 */

#define SYS_write 1
#define SYS_pause 34
#define SYS_reboot 169
#define REBOOT_MAGIC1 0xfee1deadL
#define REBOOT_MAGIC2 672274793L
#define REBOOT_CMD_POWER_OFF 0x4321fedcL

static long syscall3(long nr, long a, long b, long c)
{
	long ret;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return ret;
}

static long syscall4(long nr, long a, long b, long c, long d)
{
	register long r10 __asm__("r10") = d;
	long ret;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10)
			 : "rcx", "r11", "memory");
	return ret;
}

static void say(const char *s)
{
	long n = 0;

	while (s[n])
		n++;
	syscall3(SYS_write, 1, (long)s, n);
}

void _start(void)
{
	/* The kernel opened /dev/console as fds 0, 1 and 2 before running us. */
	say("skiff-init: started (minimal init)\n");
	say("skiff-init: poweroff\n");
	syscall4(SYS_reboot, REBOOT_MAGIC1, REBOOT_MAGIC2, REBOOT_CMD_POWER_OFF, 0);
	say("skiff-init: poweroff failed\n");
	for (;;)
		syscall3(SYS_pause, 0, 0, 0);
}
