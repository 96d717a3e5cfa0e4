//go:build linux

#include "textflag.h"

// func sigGuard(): the kernel enters it as a C signal handler, DI the
// signal, SI its siginfo, DX the context, the restorer's address on the
// stack. A code (siginfo's third int32) of zero or below is a signal
// another process sent: return. Else jump to the runtime's handler with
// everything as the kernel left it.
TEXT ·sigGuard(SB),NOSPLIT|NOFRAME,$0
	MOVL	8(SI), AX
	CMPL	AX, $0
	JLE	drop
	MOVQ	DI, CX
	ANDQ	$63, CX
	LEAQ	·sigGuardNext(SB), AX
	MOVQ	(AX)(CX*8), AX
	JMP	AX
drop:
	RET

// func sigGuardPC() uintptr
TEXT ·sigGuardPC(SB),NOSPLIT,$0-8
	MOVQ	$·sigGuard(SB), AX
	MOVQ	AX, ret+0(FP)
	RET
